"""Drop-ins for the original ChronoEdit release's commands (github.com/nv-tlabs/ChronoEdit, ``scripts/``).

Each one parses the original script's flags, prints the equivalent ``chronoedit-lora`` command and
runs it in this process; a flag with no equivalent is refused by name, with the reason.

* :mod:`.diffusers_inference` - ``scripts/run_inference_diffusers.py``
* :mod:`.diffsynth_train` - ``accelerate launch scripts/train_diffsynth.py`` (DiffSynth 1.x flags)
* :mod:`.diffsynth_inference` - ``scripts/run_inference_diffsynth.py`` (also under torchrun)
"""

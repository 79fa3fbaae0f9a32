"""Model adapters: ChronoEdit's components registered with and loaded through DiffSynth 2.x."""

from .dit import register_known_checkpoints

register_known_checkpoints()

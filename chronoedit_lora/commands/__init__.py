"""Subcommands of the ``chronoedit-lora`` CLI (thin wrappers over the library)."""

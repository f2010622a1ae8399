"""What runs on a device: flash model, flash map, bootloader (and later the agent)."""

"""MCUboot images: keys, signing, verification, inspection, and multi-image TAR packages."""

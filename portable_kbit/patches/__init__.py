"""What prepare() installs on a model, each a patch that can be applied and removed: dtype flow, attention, token
blocks, the hub-kernel rewrap."""

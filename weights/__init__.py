"""Data files: the ICNet release manifest and the official deploy prototxts it points at."""

"""Training objectives, one module per method; the interface is spoxl.methods.base."""

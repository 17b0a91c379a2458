"""One module per tracking service; each registers its backend class in reproduce.tracking.backend.BACKENDS."""

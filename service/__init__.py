"""HTTP API and data layer of the ALLY labeling service (never imports worker/ or torch)."""

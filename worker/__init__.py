"""Round execution (Celery tasks, embedded runner) and the learning library `worker.ally`."""

"""ALLY learning library: plain torch, numpy and scikit-learn; no database, Celery or HTTP."""

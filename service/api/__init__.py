"""The HTTP layer: dependencies, routes and request limits."""

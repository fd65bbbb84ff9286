"""Public interfaces of the service."""

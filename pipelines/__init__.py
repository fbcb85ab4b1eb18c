"""Compiled KFP pipelines: they only wire components, resources, secrets and caching."""

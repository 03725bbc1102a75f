"""Ingest: the gRPC servicer agents stream to, its bearer tokens and TLS, and the refusals made before it."""

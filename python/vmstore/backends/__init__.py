"""Storage backends, one module per backend.

Each module defines a class built from a :class:`vmstore.StorageConfig` that implements
:class:`vmstore.Storage`: ``nfs.NfsStorage``, ``s3.S3Storage``, ``http.HttpStorage``.
:mod:`vmstore.storage` imports a backend's module only when a config asks for it, so a
backend's third-party dependencies (boto3, requests) are needed only by that backend.
"""

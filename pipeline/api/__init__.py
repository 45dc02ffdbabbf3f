"""The HTTP front door, ``llmbatch api``: OpenAI's Files and Batches API over the pipeline.

``app`` (the FastAPI service, ``create_app``, ``serve``), ``shapes`` (OpenAI's objects and the
rules of a request, pure), ``files`` (uploads and output files on disk and in ``api_files``),
``batches`` (a batch is an llmbatch job submitted as ``llmbatch submit`` does), ``keys`` (projects
and their hashed API keys). It builds on intake (the submit), stores (jobs, results, the
OpenAI output lines), money (a cap's parsing) and paths (the modes); nothing in pipeline/
imports it.
"""

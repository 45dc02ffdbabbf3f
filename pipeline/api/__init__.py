"""The HTTP front door, ``llmbatch api``: OpenAI's Files and Batches API and Anthropic's Message
Batches over the pipeline.

``app`` (the FastAPI service, ``create_app``, ``serve``), ``shapes`` (OpenAI's objects and the
rules of a request, pure), ``files`` (uploads and output files on disk and in ``api_files``),
``batches`` (a batch is an llmbatch job submitted as ``llmbatch submit`` does), ``keys`` (projects
and their hashed API keys), ``anthropic_batches`` and ``anthropic_shapes`` (Message Batches: the
same batches in Anthropic's shapes), ``webhooks`` (one signed event per batch end). It builds on
intake (the submit), stores (jobs, results, the providers' output lines), money (a cap's parsing)
and paths (the modes); nothing in pipeline/ imports it.
"""

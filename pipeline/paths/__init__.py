"""The ways a request can reach its provider, behind one interface: :class:`pipeline.paths.base.Path`.

* ``realtime`` (``realtime.py``): our workers call the provider per request, at list price;
* ``flex`` (``flex.py``): our workers call with ``service_tier: "flex"`` at the batch price;
  a flex 429 "resource unavailable" is not billed and the request goes on at standard;
* ``provider_batch`` (``provider_batch.py``): the scheduler sends the requests to the
  provider's Batch API (OpenAI, Anthropic) at the batch price, polls and ingests.

The sequence every path follows, reserve → call → price → settle → write outcome, is
in ``base.py``; a path writes only its call. ``registry.py`` names them: a new path (a
price window, the cost engine's choice) is one module and one line there. Nothing
outside this package decides by a path's name: it asks the path.
"""

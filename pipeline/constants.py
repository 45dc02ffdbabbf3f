"""Names shared by every process: topics, queues, tiers, key prefixes, states.

Kept in one place so a producer, the batcher, the workers and the SQL agree.
"""

REQUESTS_TOPIC = "llm.requests"
#: the fast lane: requests the producer classifies immediate never wait in a
#: partition behind a bulk job's backlog
IMMEDIATE_TOPIC = "llm.requests.immediate"
DLQ_TOPIC = "llm.requests.dlq"
REQUESTS_PARTITIONS = 6
IMMEDIATE_PARTITIONS = 2

# Kafka principals (SASL/SCRAM users; pipeline/intake/kafka_admin.py grants their ACLs).
#: the stack's own admin: the only principal that may create, alter or delete topics, users and ACLs
KAFKA_ADMIN_USER = "llmbatch-admin"
#: the batcher: reads the request topics (its groups), writes the DLQ
KAFKA_BATCHER_USER = "llmbatch-batcher"
#: the pipeline's own producer (submit, the scheduler's recurring jobs); services get producers of their own
KAFKA_SUBMIT_USER = "llmbatch-submit"
#: Kafka headers of a request message: who produced it, and its proof (pipeline/intake/kafka.py sign)
PRODUCER_HEADER = "llmbatch.producer"
SIGNATURE_HEADER = "llmbatch.signature"

TIERS = ("immediate", "peak", "offpeak", "background")
#: the tier whose latency comes before everything (it never waits for a prompt-cache group's first call)
IMMEDIATE_TIER = TIERS[0]
#: Tiers whose batches go to Celery as soon as they are written.
DISPATCHED_TIERS = ("immediate", "peak")
#: Tiers whose batches wait in Postgres until the scheduler releases them.
HELD_TIERS = ("offpeak", "background")


#: the Celery task that runs a batch (workers/tasks.py); producers send it by name
EXECUTE_BATCH_TASK = "llmbatch.execute_batch"


def queue_for(tier: str) -> str:
    """Celery queue name of a tier."""
    return f"tier.{tier}"


REDIS_PREFIX = "llmbatch:"

# States, and the sets of them the code asks about. This is their one definition: SQL reads
# the sets by name, ``llmbatch_states('request_terminal')``, from a function ``db.upgrade``
# generates from ``STATE_SETS`` (pipeline/stores/db.py); no query spells a list of states.

# Request states (requests.status): waiting or in flight, then terminal. Terminal ones never change again.
REQUEST_OPEN = ("queued", "held", "running", "deferred")
REQUEST_TERMINAL = ("succeeded", "failed", "cancelled")
REQUEST_STATES = REQUEST_OPEN + REQUEST_TERMINAL
#: terminal with a result row (an answer or a final error); a cancelled request was never sent
REQUEST_ANSWERED = ("succeeded", "failed")
#: what cancelling a job ends at once; a ``running`` request is its worker's to skip before its call
REQUEST_CANCELLABLE = ("held", "queued", "deferred")

# Job states (sql/026 checks them). A job ends ``completed`` only when every request
# succeeded; ``completed_with_errors`` when some failed (or were cancelled);
# ``failed`` when none succeeded (pipeline/stores/jobs.py refresh_jobs).
JOB_STATES = ("submitting", "running", "paused_budget",
              "completed", "completed_with_errors", "failed", "cancelled")
#: not ended: a job that may still take requests and spend (its cap is loaded, it can be cancelled)
JOB_OPEN = ("submitting", "running", "paused_budget")
#: ends for ``--wait``; ``paused_budget`` can resume
JOB_TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled", "paused_budget")
#: ends in which some request did not succeed: ``submit --wait`` exits 1
JOB_UNSUCCESSFUL = ("completed_with_errors", "failed", "cancelled", "paused_budget")
#: ends after which a job takes no new request: a message for one goes to the DLQ
JOB_FINISHED = ("completed", "completed_with_errors", "failed")

# Batch states (batches.status): held -> queued -> dispatched -> running -> done; deferred (a cap
# refused its requests); submitted (inside a provider batch: held -> submitted -> done).
BATCH_STATES = ("held", "queued", "dispatched", "running", "deferred", "submitted", "done")
#: released to our workers and not taken yet: a claim takes these; a closing window holds them again
BATCH_RELEASED = ("queued", "dispatched")
#: the states only our workers' batches take
BATCH_WORKER = ("queued", "dispatched", "running")
#: not started: cancelling a job closes these once nothing open is left in them
BATCH_UNSTARTED = ("held", "queued", "dispatched", "deferred")

# Provider batch states (provider_batches.status): creating (the intent, before the provider has
# it) -> submitted -> ended; abandoned (never created, its batches held again).
PROVIDER_BATCH_STATES = ("creating", "submitted", "ended", "abandoned")
#: at the provider or on the way there: polled, cancelled with its job
PROVIDER_BATCH_OPEN = ("creating", "submitted")

#: the sets SQL reads by name (``llmbatch_states(name)``): every set above, named in lower case
STATE_SETS = {name.lower(): value for name, value in (
    ("REQUEST_STATES", REQUEST_STATES), ("REQUEST_OPEN", REQUEST_OPEN), ("REQUEST_TERMINAL", REQUEST_TERMINAL),
    ("REQUEST_ANSWERED", REQUEST_ANSWERED), ("REQUEST_CANCELLABLE", REQUEST_CANCELLABLE),
    ("JOB_STATES", JOB_STATES), ("JOB_OPEN", JOB_OPEN), ("JOB_TERMINAL", JOB_TERMINAL),
    ("JOB_UNSUCCESSFUL", JOB_UNSUCCESSFUL), ("JOB_FINISHED", JOB_FINISHED),
    ("BATCH_STATES", BATCH_STATES), ("BATCH_RELEASED", BATCH_RELEASED), ("BATCH_WORKER", BATCH_WORKER),
    ("BATCH_UNSTARTED", BATCH_UNSTARTED),
    ("PROVIDER_BATCH_STATES", PROVIDER_BATCH_STATES), ("PROVIDER_BATCH_OPEN", PROVIDER_BATCH_OPEN))}

SIMULATOR_LABEL = "simulator (no API key set: answers are simulated, not from a real model)"

# Request urls (pipeline/endpoints has one module per url). Anthropic's line format has no url:
# its Messages API path names it. The price book says which of these each model serves.
CHAT_URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"
EMBEDDINGS_URL = "/v1/embeddings"
COMPLETIONS_URL = "/v1/completions"
MODERATIONS_URL = "/v1/moderations"
ANTHROPIC_MESSAGES_URL = "/v1/messages"
ENDPOINT_URLS = (CHAT_URL, RESPONSES_URL, EMBEDDINGS_URL, COMPLETIONS_URL, MODERATIONS_URL, ANTHROPIC_MESSAGES_URL)

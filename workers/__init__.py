"""Celery workers: one queue and one worker group per tier; a task runs a batch."""

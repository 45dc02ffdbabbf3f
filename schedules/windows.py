"""The off-peak window and cron helpers, re-exported from pipeline/windows.py.

They moved to ``pipeline`` so the batcher, which may not import ``schedules``,
classifies a deadline against the same window the scheduler opens.
"""

from pipeline.windows import Window, crontab_dow, cron_trigger, fire_times, next_fire  # noqa: F401

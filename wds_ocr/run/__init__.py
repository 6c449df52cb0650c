"""The torch floor that ``train/`` and ``infer/`` both stand on: where a run executes (device, DDP,
autocast: ``runtime``) and what it saves and reads back (``checkpoint``)."""

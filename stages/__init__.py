"""The ML work of each r1flow stage. Plain functions over configs and paths; no Prefect here."""

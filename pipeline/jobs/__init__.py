"""The jobs Ray runs, on one shared fan-out (`fanout`) and one device policy (`devices`):
train, evaluate, distributed (Ray Train), discovery, reservoir, baseline, sweep (Ray Tune)."""

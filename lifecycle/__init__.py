"""The life of a run root: what a run does to its root beyond the records it writes.

One writer at a time (`lock`: RootLock over storage.lock, fencing the holder's writes), the state it
reads back and heals (`state`: damaged files set aside), what a generation shard was made from and the
one check of it (`provenance`), the release published and read back (`release`: manifest, publish,
LATEST, validate), and the process around it: SIGTERM taken as Ctrl-C and signals held where an
event loop must not be cut (`signals`), and whether progress is shown (`progress`).

Its floor: above storage and schemas (the contracts), below the wings (beam_pipelines, generation,
training) and bft, which all use it.
"""

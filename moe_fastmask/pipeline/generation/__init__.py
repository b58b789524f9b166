"""Generation backends: prompts in, generated tokens and per-group routing counts out.

:mod:`.engine` holds the static-KV-cache backend whose decode step replays as a CUDA graph; :mod:`.packing` packs
several method batches into one request and splits the counts back.
"""

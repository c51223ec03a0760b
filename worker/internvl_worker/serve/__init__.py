"""`internvl serve`: a TGI- and OpenAI-compatible HTTP server for InternVL with continuous batching.

Stages (litgpt's deploy/serve.py split): protocol.py parses requests and encodes responses, prepare.py
turns a request into prompt ids and image features (thread pool), engine.py batches decode steps over
one model (kvbatch.py holds the shared KV cache, sampling.py chooses tokens), app.py is the HTTP layer.
"""

"""The export station: a finished run's adapter, its merged 16-bit model, GGUF files and Ollama Modelfiles.

``exporter`` runs an export (after training, or ``python -m fasttune export``); ``checks`` says
before training what an export would refuse. ``merge`` writes the merged model, ``gguf_writer``
(with ``gguf_vocab`` for the tokenizer and ``quantize``/``kquants`` for the tensor types) the GGUF
file, ``modelfile`` the Modelfile, ``model_card`` the merged model's README. Only the modules that
touch weights import torch, and only when called.
"""

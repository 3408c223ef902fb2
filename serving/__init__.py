"""Inference server: engines behind one interface and an OpenAI-compatible HTTP API .

    python -m serving --model runs/ppo1/ema [--engine auto|mii|ds-inference|hf] [--port 8000]

- `config.py`: the server's options (core/options.py, like every stage's);
- `engines.py`: loading a checkpoint (safetensors only) into an `Engine`: tokenizer, end-of-turn
  tokens and a slot decoder (`core.decoder.SlotDecoder`, the generation core PPO uses too);
- `scheduler.py`: continuous batching on one thread that owns the decoder; a bounded queue;
- `api.py`: the FastAPI app (chat completions plain and streamed, /v1/models, /v1/models/load,
  /health) and its error shapes;
- `__main__.py`: the command line.

Imports only core/ of the project (never train/, chat/ or app.py): the app talks to this server
over HTTP only.
"""

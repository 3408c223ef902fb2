"""Inference server: engines behind one interface and an OpenAI-compatible HTTP API.

    RLHF_API_KEY=KEY python -m serving --model runs/ppo1/ema [--engine auto|mii|ds-inference|hf]
        [--port 8000] [--api-key-file FILE] [--max-body-mb 4] [--shutdown-grace 30] ...

- `config.py`: the server's options (core/options.py, like every stage's);
- `engines.py`: loading a checkpoint (safetensors only; hub names from the local cache only for
  /v1/models/load) into an `Engine`: tokenizer, its copy for the decoding thread, end-of-turn
  tokens and a slot decoder (`core.decoder.SlotDecoder`, the generation core PPO uses too);
- `templates.py`: chat templates rendered in a small pool of worker processes, bounded in time
  and memory, so a hostile template stalls no other client;
- `request.py`: a chat completion in flight (settings, choices, events, the failure it ends with);
- `scheduler.py`: continuous batching on one thread that owns the decoder; admission fair to
  small requests without starving large ones; a bounded queue; errors isolated per request;
  checkpoint swaps and the graceful shutdown;
- `detokenizer.py`: answer text from tokens incrementally (O(new tokens) per token), whole
  characters only, stop strings held back and cut;
- `validation.py`: what a request may ask for (every sampling parameter's real range), checked
  before it joins the batch; errors in OpenAI's shape;
- `api.py`: the FastAPI app (chat completions plain and streamed, /v1/models, /v1/models/load,
  /health), the API key on /v1 routes and the docs, replies and errors;
- `connections.py`: what a connection may cost: the header deadline, the body limit (413) and
  deadline (408), the connection cap (503);
- `__main__.py`: the command line: the API key from a flag, a file or RLHF_API_KEY; SIGTERM and
  Ctrl-C shut down gracefully.

Imports only core/ of the project (never train/, chat/ or app.py): the app talks to this server
over HTTP only.
"""

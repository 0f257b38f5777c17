"""The offline GPU benchmark kit: real vLLM behind loraroute on an air-gapped GPU host.

- ``wheelhouse``: on a machine with package access, the packages the host lacks, as parts;
- ``parts``: split / join / verify with a sha256 manifest (standard library only);
- ``model``: the benchmark model folder (config, offline tokenizer, chat template) and adapters;
- ``host``: the driver that runs on the GPU host (servers, state plane, gateway, replays, results);
- ``counterpart``: the same spec replayed on the simulator, and real vs simulated tables.

How to use it: docs/real-gpu.md. ``python3 -m bench.gpu …`` and ``loraroute bench gpu …`` are the
same commands.
"""

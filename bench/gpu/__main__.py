"""``python3 -m bench.gpu …`` (the GPU host has no ``loraroute`` script)."""

from bench.gpu.cli import main

raise SystemExit(main())

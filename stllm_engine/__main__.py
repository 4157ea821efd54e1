"""``python -m stllm_engine`` runs the command line (:mod:`stllm_engine.cli`)."""
import sys

from stllm_engine.cli import main

sys.exit(main())

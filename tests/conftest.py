import sys
from pathlib import Path

# shared test helpers (e.g. hf_reference) import as top-level modules; tests themselves are
# imported by path (--import-mode=importlib), so tests/stages never shadows the stages package
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # tests/book_check.py is importable as a module

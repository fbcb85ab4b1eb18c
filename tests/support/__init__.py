"""What the tests share that is not a test: servers, fakes and harnesses (``from support import
servers``; tests/conftest.py puts tests/ on the path)."""

"""``python -m brokerexec``: the same as the ``brokerexec`` command."""

from .cli import main

if __name__ == "__main__":
    main()

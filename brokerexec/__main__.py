"""``python -m brokerexec``: the same as the ``brokerexec`` command."""

from .cli.app import main

if __name__ == "__main__":
    main()

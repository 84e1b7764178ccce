"""python -m lorakit"""

from lorakit.cli import app

app()

"""``python -m rsam.data.synthetic``: see :func:`rsam.data.synthetic.main`."""
from rsam.data.synthetic import main

main()

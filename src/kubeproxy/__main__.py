import sys

from kubeproxy.app.cli import main

sys.exit(main())

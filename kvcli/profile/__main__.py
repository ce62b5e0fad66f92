"""``python -m kvcli.profile``: one isolated profiling child (see ``profile.run_profile``)."""

from .profile import child_main

child_main()

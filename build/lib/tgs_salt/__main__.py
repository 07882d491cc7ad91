from tgs_salt.cli import main

raise SystemExit(main())

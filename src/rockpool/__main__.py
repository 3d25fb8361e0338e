from rockpool.cli import main

raise SystemExit(main())

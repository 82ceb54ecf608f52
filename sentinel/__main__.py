from sentinel.cli.main import main

raise SystemExit(main())

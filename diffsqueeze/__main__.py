from diffsqueeze.cli import main

raise SystemExit(main())

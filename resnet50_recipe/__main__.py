import sys

from resnet50_recipe.cli import main

sys.exit(main())

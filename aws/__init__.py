"""The launch assets (user data, IAM policy template), shipped inside the package as resnet50_recipe.aws_files."""

module github.com/vhost-vhdx/vhost-vhdx

go 1.26.8

require (
	github.com/google/uuid v1.6.0
	github.com/sirupsen/logrus v1.10.2
	golang.org/x/sys v0.50.0
)

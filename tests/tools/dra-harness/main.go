// Command dra-harness runs Kubernetes' own DRA code (v1.37.2 modules) against a DRA driver, for
// hostdev's tests. One binary, four subcommands (one link step; they share most packages):
//
//	dra-harness allocate  the scheduler's structured allocator on the published ResourceSlices
//	                      for one claim, the result written into the claim's status
//	dra-harness kubelet   the kubelet's DRA manager with plugin registration, driven over stdin
//	dra-harness metadata  a KEP-5304 device-metadata file decoded by upstream devicemetadata
//	dra-harness cdi       CDI spec directories parsed and device IDs resolved by the CDI library
//
// The full contract (flags, stdin, stdout JSON, exit codes) is in tests/tools/README.md
// ("dra-harness"); each subcommand's file starts with its own summary.
//
// Exit status: 0 success; 1 error (one line on stderr); 2 bad flags; 4 allocate found no fit
// within --timeout (JSON still printed).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// Exit codes shared by the subcommands.
const (
	exitError    = 1
	exitUsage    = 2
	exitNoFit    = 4
	harnessName  = "dra-harness"
	usageSummary = "usage: dra-harness allocate|kubelet|metadata|cdi [flags] (see --help of each)"
)

// errNoFit makes main exit with exitNoFit after the subcommand printed its JSON.
var errNoFit = errors.New("no fit")

// usageError makes main exit with exitUsage.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

var subcommands = map[string]func(args []string) error{
	"allocate": runAllocate,
	"kubelet":  runKubelet,
	"metadata": runMetadata,
	"cdi":      runCDI,
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usageSummary)
		os.Exit(exitUsage)
	}
	cmd, ok := subcommands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "%s: unknown subcommand %q; %s\n", harnessName, os.Args[1], usageSummary)
		os.Exit(exitUsage)
	}
	err := cmd(os.Args[2:])
	var ue usageError
	switch {
	case err == nil:
	case errors.Is(err, errNoFit):
		os.Exit(exitNoFit)
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.As(err, &ue):
		fmt.Fprintf(os.Stderr, "%s %s: %s\n", harnessName, os.Args[1], ue.msg)
		os.Exit(exitUsage)
	default:
		fmt.Fprintf(os.Stderr, "%s %s: %s\n", harnessName, os.Args[1],
			strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(exitError)
	}
}

// newFlags is a flag set whose parse errors become usage errors (exit 2).
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(harnessName+" "+name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	return nil
}

// required returns a usage error naming the first empty flag.
func required(flags map[string]string) error {
	names := make([]string, 0, len(flags))
	for n := range flags {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if flags[n] == "" {
			return usageError{"--" + n + " is required"}
		}
	}
	return nil
}

// stderrLogger logs JSON lines to stderr up to verbosity v and installs itself as klog's logger
// (some kubelet goroutines log through klog's global logger).
func stderrLogger(v int) logr.Logger {
	logger := funcr.NewJSON(func(obj string) { fmt.Fprintln(os.Stderr, obj) },
		funcr.Options{Verbosity: v, LogTimestamp: true})
	klog.SetLogger(logger)
	return logger
}

func clientFor(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	cfg.UserAgent = harnessName
	return kubernetes.NewForConfig(cfg)
}

// printJSON writes one JSON value as one line to stdout.
func printJSON(v any) error {
	return json.NewEncoder(os.Stdout).Encode(v) // Encode ends the value with a newline
}

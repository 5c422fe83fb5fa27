// Command obd-recorder records which blocks of an overlaybd image's device a
// container reads. Each subcommand lives in its own file and is registered
// in newRootCmd; the logic lives in packages (bpf, recorder), not here.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "obd-recorder:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "obd-recorder",
		Short:         "Record the blocks a container reads from its overlaybd image",
		SilenceUsage:  true,
		SilenceErrors: true, // main prints the error once, prefixed
	}
	root.AddCommand(
		newCaptureCmd(),
		newTraceCommand(),
		newRecordCmd(),
	)
	return root
}

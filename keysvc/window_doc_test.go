package keysvc

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/keygate/keygate/attest"
)

// TestOperatorPolicyExamples: every policy example in docs/operator.md (a
// JSON block, or the heredoc written to a .policy.json file) is one that
// `policy set` accepts.
func TestOperatorPolicyExamples(t *testing.T) {
	doc, err := os.ReadFile("../docs/operator.md")
	if err != nil {
		t.Fatal(err)
	}
	var examples []string
	for _, m := range regexp.MustCompile("(?s)```json\n(.*?)```").FindAllStringSubmatch(string(doc), -1) {
		if strings.Contains(m[1], `"pcrs"`) {
			examples = append(examples, m[1])
		}
	}
	for _, m := range regexp.MustCompile(`(?s)cat > \S+\.policy\.json <<'EOF'\n(.*?)\nEOF`).FindAllStringSubmatch(string(doc), -1) {
		examples = append(examples, m[1])
	}
	if len(examples) < 2 {
		t.Fatalf("found %d policy examples in docs/operator.md, want at least 2 (did the markup change?)", len(examples))
	}
	for i, ex := range examples {
		p, err := attest.ParsePolicy([]byte(ex))
		if err == nil {
			err = checkWindowPolicy(p)
		}
		if err != nil {
			t.Errorf("example %d is not a valid policy: %v\n%s", i, err, ex)
		}
	}
}

package luks2

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
)

// LUKS2 metadata must survive a rewrite by keygate with every field it does
// not know (cryptsetup features, other tools' tokens). Each JSON object type
// therefore decodes its known fields into a struct and keeps the rest in an
// "extra" map that is merged back on encode.

var fieldNameCache sync.Map // reflect.Type -> []string

// jsonFieldNames lists the JSON names of the exported fields of struct t.
func jsonFieldNames(t reflect.Type) []string {
	if v, ok := fieldNameCache.Load(t); ok {
		return v.([]string)
	}
	var names []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := strings.Split(f.Tag.Get("json"), ",")[0]
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		names = append(names, name)
	}
	fieldNameCache.Store(t, names)
	return names
}

// decodeObject decodes JSON object data into the struct v points to and
// returns the members that are not struct fields. Go's decoder matches
// field names case-insensitively and json-c (cryptsetup) does not, so a
// member that differs from a known field only in case is refused rather
// than silently taken for it.
func decodeObject(data []byte, v any) (map[string]json.RawMessage, error) {
	var all map[string]json.RawMessage
	if err := json.Unmarshal(data, &all); err != nil {
		return nil, err
	}
	if all == nil {
		return nil, fmt.Errorf("expected an object, got %.20s", data)
	}
	names := jsonFieldNames(reflect.TypeOf(v).Elem())
	for k := range all {
		for _, n := range names {
			if k != n && strings.EqualFold(k, n) {
				return nil, fmt.Errorf("member %q: did you mean %q? (LUKS2 names are case-sensitive)", k, n)
			}
		}
	}
	if err := json.Unmarshal(data, v); err != nil {
		return nil, err
	}
	for _, n := range names {
		delete(all, n)
	}
	if len(all) == 0 {
		return nil, nil
	}
	return all, nil
}

// encodeObject encodes struct v with the extra members merged in. Known
// fields win over extras of the same name.
func encodeObject(v any, extra map[string]json.RawMessage) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil || len(extra) == 0 {
		return b, err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil {
		return nil, err
	}
	for k, x := range extra {
		if _, ok := all[k]; !ok {
			all[k] = x
		}
	}
	return json.Marshal(all)
}

// u64s is a uint64 that LUKS2 stores as a JSON string of decimal digits
// (json-c has no unsigned 64-bit numbers).
type u64s uint64

func (u u64s) MarshalJSON() ([]byte, error) {
	return []byte(`"` + strconv.FormatUint(uint64(u), 10) + `"`), nil
}

func (u *u64s) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a decimal string, got %.24s", b)
	}
	n, err := parseU64(s)
	if err != nil {
		return err
	}
	*u = u64s(n)
	return nil
}

// parseU64 accepts only plain decimal digits, as cryptsetup does.
func parseU64(s string) (uint64, error) {
	if s == "" || len(s) > 20 || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%q is not a decimal number", s)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is out of range", s)
	}
	return n, nil
}

// parseID parses an object key or reference such as "0".."31".
func parseID(s string, max int) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n >= max || strconv.Itoa(n) != s {
		return 0, fmt.Errorf("id %q is not a number from 0 to %d", s, max-1)
	}
	return n, nil
}

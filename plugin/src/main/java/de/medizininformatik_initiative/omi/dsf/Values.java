package de.medizininformatik_initiative.omi.dsf;

import java.math.BigDecimal;

import org.hl7.fhir.r4.model.BooleanType;
import org.hl7.fhir.r4.model.CodeableConcept;
import org.hl7.fhir.r4.model.Coding;
import org.hl7.fhir.r4.model.DecimalType;
import org.hl7.fhir.r4.model.IntegerType;
import org.hl7.fhir.r4.model.PrimitiveType;
import org.hl7.fhir.r4.model.StringType;
import org.hl7.fhir.r4.model.Type;

import dev.dsf.bpe.v1.variables.Variables;

/** Process variables ⇄ FHIR primitive values, the one conversion all the glue shares. */
final class Values
{
	private Values()
	{
	}

	static Type toFhir(Object value)
	{
		if (value instanceof Boolean b)
			return new BooleanType(b);
		if (value instanceof Integer i)
			return new IntegerType(i);
		if (value instanceof Long l)
			return new IntegerType(Math.toIntExact(l));
		if (value instanceof Double d)
			return new DecimalType(BigDecimal.valueOf(d));
		if (value instanceof BigDecimal d)
			return new DecimalType(d);
		return new StringType(String.valueOf(value));
	}

	/** Sets variable {@code name} from a FHIR value; values without a primitive form are ignored. */
	static void setVariable(Variables variables, String name, Type value)
	{
		if (value instanceof BooleanType b)
			variables.setBoolean(name, b.getValue());
		else if (value instanceof IntegerType i)
			variables.setInteger(name, i.getValue());
		else if (value instanceof DecimalType d)
			variables.setDouble(name, d.getValue().doubleValue());
		else if (value instanceof PrimitiveType<?> p && p.hasValue())
			variables.setString(name, p.getValueAsString());
	}

	static CodeableConcept code(String system, String code)
	{
		return new CodeableConcept(new Coding(system, code, null));
	}

	/** The code of {@code concept} in {@code system}, or null. */
	static String codeIn(CodeableConcept concept, String system)
	{
		return concept.getCoding().stream().filter(c -> system.equals(c.getSystem())).map(Coding::getCode)
				.findFirst().orElse(null);
	}
}
